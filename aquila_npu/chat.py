"""Conversation templates: how a chat model expects a multi-turn conversation written as one prompt.

A model family declares its templates (``ModelFamily.chat_templates``); the generator renders a list of messages
with the template and lets the model continue the assistant's turn. The two separator styles here are those of
FastChat's ``Conversation.get_prompt`` (which the published AquilaChat2 templates use), reproduced exactly so a
prompt is byte-for-byte what the model was served with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

from aquila_npu.errors import AquilaNpuError

STYLES = ("no_colon_two", "add_colon_two")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class ChatTemplate:
    """One conversation template.

    style ``no_colon_two``: ``system + user_role + msg + sep + assistant_role + msg + sep2 + ... + assistant_role``;
    style ``add_colon_two``: ``system + sep + user_role + ": " + msg + sep + assistant_role + ": " + msg + sep2 +
    ... + assistant_role + ":"``. ``generation_suffix`` is appended after the open assistant turn (BAAI's
    ``predict.py`` tokenises ``prompt + " "``); ``stop`` are strings that end a reply.
    """

    name: str
    user_role: str
    assistant_role: str
    style: str = "no_colon_two"
    system_message: str = ""
    sep: str = ""
    sep2: str = ""
    generation_suffix: str = ""
    stop: tuple[str, ...] = ()
    # prepend the tokenizer's BOS id to the rendered prompt (BAAI's chat prompts have none)
    add_bos: bool = False
    description: str = ""

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise AquilaNpuError(f"chat template {self.name!r}: style must be one of {', '.join(STYLES)}")

    def render(self, messages: Iterable[Mapping[str, str]]) -> str:
        """The prompt for the assistant's next turn after ``messages`` (``{"role", "content"}`` dicts, roles
        ``system`` (first only), ``user`` and ``assistant`` alternating from ``user``, ending with ``user``)."""
        system, turns = self._system_and_turns(messages)
        if not turns or len(turns) % 2 == 0:
            raise AquilaNpuError("a chat must end with a user message (the assistant's turn is generated)")
        roles, seps = (self.user_role, self.assistant_role), (self.sep, self.sep2)
        if self.style == "no_colon_two":
            text = system
            for i, content in enumerate(turns):
                text += roles[i % 2] + content + seps[i % 2]
            text += self.assistant_role
        else:
            text = system + self.sep
            for i, content in enumerate(turns):
                text += roles[i % 2] + ": " + content + seps[i % 2]
            text += self.assistant_role + ":"
        return text + self.generation_suffix

    def conversation_segments(self, messages: Iterable[Mapping[str, str]]) -> list[tuple[str, bool]]:
        """A whole conversation, replies included, as the template writes it (FastChat's ``get_prompt`` with every
        message filled in: the text models of this template were fine-tuned on), cut into ``(text, trained)``
        pieces: ``trained`` marks each assistant reply with the separator that ends it (``sep2``, the end token);
        everything else (system message, user turns, role names) is context. The pieces join to the whole text.
        ``messages``: an optional system message, then user and assistant turns alternating from user, ending with
        an assistant reply."""
        system, turns = self._system_and_turns(messages)
        if not turns or len(turns) % 2:
            raise AquilaNpuError("a conversation to train on ends with an assistant reply")
        colon = "" if self.style == "no_colon_two" else ": "
        pieces: list[tuple[str, bool]] = []
        context = system if self.style == "no_colon_two" else system + self.sep
        for index, content in enumerate(turns):
            if index % 2 == 0:
                context += self.user_role + colon + content + self.sep
            else:
                context += self.assistant_role + colon
                pieces += [(context, False), (content + self.sep2, True)]
                context = ""
        return [(text, trained) for text, trained in pieces if text]

    def _system_and_turns(self, messages: Iterable[Mapping[str, str]]) -> tuple[str, list[str]]:
        """The system message (the template's unless the first message is one) and the turns' texts, user first,
        checked to alternate user/assistant."""
        messages = list(messages)
        system = self.system_message
        if messages and messages[0].get("role") == "system":
            system, messages = str(messages[0].get("content", "")), messages[1:]
        turns = []
        for index, message in enumerate(messages):
            role, content = message.get("role"), message.get("content")
            expected = "user" if index % 2 == 0 else "assistant"
            if role != expected:
                raise AquilaNpuError(f"chat message {index + 1}: role {role!r} where {expected!r} was expected "
                                     f"(roles alternate user/assistant after an optional system message)")
            if not isinstance(content, str):
                raise AquilaNpuError(f"chat message {index + 1}: content must be a string")
            turns.append(content)
        return system, turns

    def reply_text(self, generated: str) -> str:
        """The assistant's reply in ``generated``: cut at the first stop string; the leading space the model
        writes after ``generation_suffix`` dropped, as BAAI's ``predict.py`` does."""
        for stop in self.stop:
            if stop in generated:
                generated = generated[:generated.index(stop)]
        return generated[1:] if generated.startswith(" ") else generated
