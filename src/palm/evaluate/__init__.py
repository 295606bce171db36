"""Measuring a model: bits per byte on held-out text, zero- and few-shot tasks, and lm-evaluation-harness.

Three ways in, a module each, and `eval_report` (in `report`), which runs what `palm eval` asks for:

- `perplexity`: `score_stream` / `score_text` / `evaluate_corpora`, the negative log-likelihood of
  a token stream with a sliding window (every token predicted once, with at least
  `seq_len - stride` tokens of context once the window slides), reported as perplexity and bits
  per UTF-8 byte per corpus of a mixture;
- `tasks` and `scoring`: `load_task` / `evaluate_task`, the paper's few-shot protocol on local task
  files. Multiple choice is scored by the log-likelihood of each choice (accuracy and
  length-normalised accuracy), generation greedily, by the `metrics` as the field reports them:
  SQuAD's exact match and token F1 over several references, ROUGE-1/2/L/Lsum (`rouge-score`),
  BLEU, chrF and chrF++ with sacreBLEU's signature;
- `harness`: `run_harness`, lm-evaluation-harness's `hf` model on a palm directory, in this
  process, so palm's registration with the Auto classes is all it needs.

Task files. A `.jsonl` file holds one example per line: `{"prompt": str, "answer": str}` for generation,
(or `"answer": [str, ...]`, several references), `{"prompt": str, "choices": [str, ...], "answer": int}` for multiple choice, or `{"messages": [{"role",
"content"}, ...], "answer": str}` for chat, where the model writes the next assistant turn, prompted by
the chat template and stopped by its end-of-turn token (the kind follows from the first row). A `.yaml`
file names such a file and says how to use it:

    name: arithmetic            # default: the YAML file's name
    file: test.jsonl            # relative to the YAML file
    kind: generate              # or multiple_choice, or chat
    template: "Q: {prompt}\\nA:" # the prompt as the model sees it (Python format string)
    target_delimiter: " "       # between the templated prompt and its answer (default: nothing)
    metric: exact_match         # or f1, exact_string, rouge1, rouge2, rouge_l, rouge_lsum, bleu, chrf, chrf++, or a
                                # list of them; multiple_choice: accuracy (acc and acc_norm)
    fewshot_file: train.jsonl   # k-shot examples come from this split (default: the other test examples)
    fewshot_delimiter: "\\n\\n"   # between examples of a k-shot prompt
    max_new_tokens: 16          # generation only
    stop: ["\\n"]                # generation stops at any of these (default: a newline)

May import: model, core, text, data, weights, inference.
"""

from ..core.atomic import write_json
from .errors import EXTRAS_HINT, EvaluationError, TaskError
from .harness import HarnessConfig, run_harness
from .metrics import (
    GENERATION_METRICS,
    WordsAndCharacters,
    bleu,
    chrf,
    chrf_pp,
    exact_match,
    exact_string,
    f1,
    rouge1,
    rouge2,
    rouge_l,
    rouge_lsum,
    signature,
)
from .perplexity import CorpusEvalConfig, TextScore, evaluate_corpora, score_stream, score_text, sliding_windows
from .report import EvalRequest, corpus_table, eval_report, format_table, load_model, task_table
from .scoring import evaluate_task, loglikelihoods, split_for_scoring
from .tasks import (
    DEFAULT_METRIC,
    METRICS,
    Example,
    Task,
    build_prompt,
    fewshot_examples,
    load_task,
    load_tasks,
    read_examples,
    split_names,
)

__all__ = [
    "DEFAULT_METRIC",
    "EXTRAS_HINT",
    "GENERATION_METRICS",
    "METRICS",
    "CorpusEvalConfig",
    "EvalRequest",
    "EvaluationError",
    "Example",
    "HarnessConfig",
    "Task",
    "TaskError",
    "TextScore",
    "WordsAndCharacters",
    "bleu",
    "build_prompt",
    "chrf",
    "chrf_pp",
    "exact_string",
    "f1",
    "rouge1",
    "rouge2",
    "rouge_lsum",
    "signature",
    "corpus_table",
    "eval_report",
    "evaluate_corpora",
    "evaluate_task",
    "exact_match",
    "fewshot_examples",
    "format_table",
    "load_model",
    "load_task",
    "load_tasks",
    "loglikelihoods",
    "read_examples",
    "rouge_l",
    "run_harness",
    "score_stream",
    "score_text",
    "sliding_windows",
    "split_for_scoring",
    "split_names",
    "task_table",
    "write_json",
]
