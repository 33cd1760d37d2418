"""Multiple-choice tasks read from local files, each prompted exactly as lm-evaluation-harness prompts it.

A task turns its files into ``Example``s: a context, the choices (as the text that follows the context) and the
gold index. Prompts, choices and descriptions are lm-evaluation-harness's (v0.4: ``super_glue/boolq``,
``mmlu/default``, ``ceval/ceval-valid``), so the numbers are comparable with everyone else's:

* ``boolq``: Google's BoolQ JSONL (``question``, ``passage``, ``answer``: bool, optional ``title``);
  ``"{passage}\\nQuestion: {question}?\\nAnswer:"``, choices ``" no"`` / ``" yes"``;
* ``mmlu``: Hendrycks' CSV files ``{subject}_test.csv`` (no header: question, A, B, C, D, answer letter) or JSONL
  as ``cais/mmlu`` (``question``, ``choices``, ``answer``: index, ``subject``); the subject's description, then
  ``"{question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"``, choices ``" A"`` .. ``" D"``;
* ``ceval``: C-Eval's CSV files ``{subject}_val.csv`` (header ``id,question,A,B,C,D,answer[,explanation]``);
  the subject's Chinese description, ``"...\\n答案："``, choices ``" A"`` .. ``" D"``.

Few-shot examples (``--num-fewshot``) are the first ``n`` of the few-shot file (lm-evaluation-harness's
``first_n`` sampler, which it uses for MMLU and C-Eval; for BoolQ it samples the training split at random).
"""

from __future__ import annotations

import csv
import glob
import os
from dataclasses import dataclass, field

from aquila_npu.errors import AquilaNpuError
from aquila_npu.files import read_json_lines

TARGET_DELIMITER = " "
FEWSHOT_DELIMITER = "\n\n"
LETTERS = ("A", "B", "C", "D")

# C-Eval subject -> its Chinese name, as lm-evaluation-harness's ceval task descriptions use them
CEVAL_SUBJECTS = {
    "computer_network": "计算机网络", "operating_system": "操作系统", "computer_architecture": "计算机组成",
    "college_programming": "大学编程", "college_physics": "大学物理", "college_chemistry": "大学化学",
    "advanced_mathematics": "高等数学", "probability_and_statistics": "概率统计", "discrete_mathematics": "离散数学",
    "electrical_engineer": "注册电气工程师", "metrology_engineer": "注册计量师", "high_school_mathematics": "高中数学",
    "high_school_physics": "高中物理", "high_school_chemistry": "高中化学", "high_school_biology": "高中生物",
    "middle_school_mathematics": "初中数学", "middle_school_biology": "初中生物", "middle_school_physics": "初中物理",
    "middle_school_chemistry": "初中化学", "veterinary_medicine": "兽医学", "college_economics": "大学经济学",
    "business_administration": "工商管理", "marxism": "马克思主义基本原理",
    "mao_zedong_thought": "毛泽东思想和中国特色社会主义理论体系概论", "education_science": "教育学",
    "teacher_qualification": "教师资格", "high_school_politics": "高中政治", "high_school_geography": "高中地理",
    "middle_school_politics": "初中政治", "middle_school_geography": "初中地理", "modern_chinese_history": "近代史纲要",
    "ideological_and_moral_cultivation": "思想道德修养与法律基础", "logic": "逻辑学", "law": "法学",
    "chinese_language_and_literature": "中国语言文学", "art_studies": "艺术学", "professional_tour_guide": "导游资格",
    "legal_professional": "法律职业资格", "high_school_chinese": "高中语文", "high_school_history": "高中历史",
    "middle_school_history": "初中历史", "civil_servant": "公务员", "sports_science": "体育学",
    "plant_protection": "植物保护", "basic_medicine": "基础医学", "clinical_medicine": "临床医学",
    "urban_and_rural_planner": "注册城乡规划师", "accountant": "注册会计师", "fire_engineer": "注册消防工程师",
    "environmental_impact_assessment_engineer": "环境影响评价工程师", "tax_accountant": "税务师", "physician": "医师资格",
}


@dataclass
class Doc:
    """One question as read: the prompt text without the task description, the choice labels, the gold index."""

    text: str
    choices: tuple[str, ...]
    label: int
    subject: str = ""
    where: str = ""  # file and line, for messages


@dataclass
class Example:
    index: int
    context: str  # description + few-shot examples + the question's prompt
    continuations: tuple[str, ...]  # the text scored after the context, one per choice
    choice_names: tuple[str, ...]  # how the results name the choices ("no", "yes"; "A".."D")
    label: int
    subject: str = ""
    first_token_choices: tuple[str, ...] = field(default_factory=tuple)  # ModelLink's first-token scoring


def _field(record: dict, name: str, kind, where: str):
    if name not in record:
        raise AquilaNpuError(f"{where}: no {name!r} field")
    value = record[name]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AquilaNpuError(f"{where}: {name!r} must be {getattr(kind, '__name__', kind)}, not {type(value).__name__}")
    return value


def _files(path: str, patterns: tuple[str, ...], task: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise AquilaNpuError(f"--task-data-path {path}: no such file or folder")
    files = sorted({f for pattern in patterns for f in glob.glob(os.path.join(path, "**", pattern), recursive=True)})
    if not files:
        raise AquilaNpuError(f"--task-data-path {path}: no {' or '.join(patterns)} files for {task}")
    return files


class Task:
    name = ""
    description_template = ""
    choice_names: tuple[str, ...] = ()
    first_token_choices: tuple[str, ...] = ()

    def read(self, path: str, suffix: str | None = None) -> list[Doc]:
        """The questions in ``path`` (a file, or a folder of the task's files; ``suffix`` picks a split's files
        where the task names them ``{subject}{suffix}.csv``)."""
        raise NotImplementedError

    def fewshot_docs(self, path: str) -> list[Doc]:
        """The few-shot pool beside ``path``."""
        return self.read(path)

    def description(self, subject: str) -> str:
        return self.description_template.format(subject=subject) if self.description_template else ""

    def examples(self, docs: list[Doc], fewshot: list[Doc], num_fewshot: int) -> list[Example]:
        examples = []
        for index, doc in enumerate(docs):
            shots = [d for d in fewshot if d.subject == doc.subject][:num_fewshot] if num_fewshot else []
            if num_fewshot and len(shots) < num_fewshot:
                raise AquilaNpuError(f"--num-fewshot {num_fewshot}: only {len(shots)} few-shot examples for "
                                     f"{doc.subject or self.name}")
            context = self.description(doc.subject) + "".join(
                shot.text + TARGET_DELIMITER + shot.choices[shot.label] + FEWSHOT_DELIMITER for shot in shots
            ) + doc.text
            examples.append(Example(index, context, tuple(TARGET_DELIMITER + c for c in doc.choices),
                                    self.choice_names or doc.choices, doc.label, doc.subject,
                                    self.first_token_choices))
        return examples


class BoolQ(Task):
    name = "boolq"
    choice_names = ("no", "yes")
    # ModelLink's BoolQ: the probabilities of the first tokens of "No" and "Yes" after the prompt
    first_token_choices = ("No", "Yes")

    def read(self, path: str, suffix: str | None = None) -> list[Doc]:
        docs = []
        for file in _files(path, ("*.jsonl", "*.json"), self.name):
            for number, record in read_json_lines(file):
                where = f"{file}, line {number}"
                question = _field(record, "question", str, where)
                passage = _field(record, "passage", str, where)
                answer = _field(record, "answer", bool, where)
                docs.append(Doc(f"{passage}\nQuestion: {question}?\nAnswer:", ("no", "yes"), int(answer),
                                where=where))
        return docs


class _LetterChoice(Task):
    choice_names = LETTERS
    first_token_choices = LETTERS

    def _doc(self, question: str, options, answer, subject: str, where: str, suffix: str) -> Doc:
        if len(options) != 4 or not all(isinstance(o, str) for o in options):
            raise AquilaNpuError(f"{where}: expected 4 answer options (text), got {len(options)}")
        if isinstance(answer, str) and answer.strip() in LETTERS:
            label = LETTERS.index(answer.strip())
        elif isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < 4:
            label = answer
        else:
            raise AquilaNpuError(f"{where}: answer {answer!r} is not one of A, B, C, D (or 0-3)")
        text = question.strip() + "".join(f"\n{letter}. {option}" for letter, option in zip(LETTERS, options))
        return Doc(text + suffix, LETTERS, label, subject, where)

    def fewshot_docs(self, path: str) -> list[Doc]:
        folder = os.path.abspath(path if os.path.isdir(path) else os.path.dirname(path))
        shots = []
        for where in (folder, os.path.dirname(folder)):  # beside the files, or a sibling dev/ folder
            shots = sorted(glob.glob(os.path.join(where, "**", f"*{self.fewshot_suffix}.csv"), recursive=True))
            if shots:
                break
        if not shots:
            raise AquilaNpuError(f"--num-fewshot needs the task's few-shot files (*{self.fewshot_suffix}.csv) "
                                 f"beside {path} or in a folder next to it")
        return [doc for file in shots for doc in self.read(file, self.fewshot_suffix)]

    @staticmethod
    def _subject(file: str, suffix: str) -> str:
        """``abstract_algebra`` of ``abstract_algebra_test.csv`` (the file's stem when it lacks the suffix)."""
        name = os.path.basename(file)
        return name[:-len(f"{suffix}.csv")] if name.endswith(f"{suffix}.csv") else os.path.splitext(name)[0]

    def _csv_rows(self, file: str):
        try:
            with open(file, encoding="utf-8", newline="") as f:
                rows = list(csv.reader(f))
        except UnicodeDecodeError as exc:
            raise AquilaNpuError(f"{file}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
        except (OSError, csv.Error) as exc:
            raise AquilaNpuError(f"{file}: cannot read it ({type(exc).__name__}: {exc})") from None
        return [(number, row) for number, row in enumerate(rows, 1) if row]


class MMLU(_LetterChoice):
    name = "mmlu"
    description_template = "The following are multiple choice questions (with answers) about {subject}.\n\n"
    split_suffix, fewshot_suffix = "_test", "_dev"

    def description(self, subject: str) -> str:
        return self.description_template.format(subject=subject.replace("_", " "))

    def read(self, path: str, suffix: str | None = None) -> list[Doc]:
        suffix = suffix or self.split_suffix
        docs = []
        for file in _files(path, (f"*{suffix}.csv", "*.jsonl"), self.name):
            if file.endswith(".jsonl"):
                for number, record in read_json_lines(file):
                    where = f"{file}, line {number}"
                    docs.append(self._doc(_field(record, "question", str, where),
                                          _field(record, "choices", list, where), record.get("answer"),
                                          _field(record, "subject", str, where), where, "\nAnswer:"))
                continue
            subject = self._subject(file, suffix)
            for number, row in self._csv_rows(file):
                where = f"{file}, line {number}"
                if len(row) != 6:
                    raise AquilaNpuError(f"{where}: expected 6 columns (question, A, B, C, D, answer), got {len(row)}")
                docs.append(self._doc(row[0], row[1:5], row[5], subject, where, "\nAnswer:"))
        return docs


class CEval(_LetterChoice):
    name = "ceval"
    description_template = "以下是中国关于{subject}的单项选择题，请选出其中的正确答案。\n\n"
    split_suffix, fewshot_suffix = "_val", "_dev"

    def description(self, subject: str) -> str:
        return self.description_template.format(subject=CEVAL_SUBJECTS.get(subject, subject))

    def read(self, path: str, suffix: str | None = None) -> list[Doc]:
        suffix = suffix or self.split_suffix
        docs = []
        for file in _files(path, (f"*{suffix}.csv",), self.name):
            subject = self._subject(file, suffix)
            rows = self._csv_rows(file)
            if not rows:
                continue
            header = [h.strip() for h in rows[0][1]]
            missing = [h for h in ("question", "A", "B", "C", "D", "answer") if h not in header]
            if missing:
                raise AquilaNpuError(f"{file}, line 1: header lacks {', '.join(missing)} (C-Eval's header is "
                                     f"id,question,A,B,C,D,answer[,explanation])")
            col = {h: header.index(h) for h in ("question", "A", "B", "C", "D", "answer")}
            for number, row in rows[1:]:
                where = f"{file}, line {number}"
                if len(row) < len(header):
                    raise AquilaNpuError(f"{where}: {len(row)} columns, the header has {len(header)}")
                docs.append(self._doc(row[col["question"]], [row[col[c]] for c in LETTERS], row[col["answer"]],
                                      subject, where, "\n答案："))
        return docs


TASKS = {task.name: task for task in (BoolQ(), MMLU(), CEval())}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise AquilaNpuError(f"unknown task {name!r}; known: {', '.join(TASKS)}")
    return TASKS[name]
