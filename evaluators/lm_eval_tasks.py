"""lm-eval-harness tasks as domain objectives (the optional extra `safemerge[lm-eval]`).

`EngineLM` is an lm-eval `LM` over a running generation backend: the task's log-likelihood and generation
requests are answered by the engine that holds the merged weights, so a trial needs no second engine and no
reload. `LmEvalDomain` holds one task (loaded once per worker) and splits its evaluation documents into the
search's dev and test halves; it scores any subset of them, one 0/1 verdict per document, so a task's accuracy
is a rate like every other domain accuracy (Wilson interval, multi-fidelity rungs)."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from safemerge.errors import UserError

SOURCE_PREFIX = "lm_eval:"
# Per-document metrics a search can use as a domain accuracy, best first: acc_norm (lm-eval's length-normalized
# multiple-choice accuracy), acc, exact_match (generation tasks). Each is 0 or 1 per document.
RATE_METRICS = ("acc_norm", "acc", "exact_match")


def task_of(source: str) -> str | None:
    """The task name of a domain source written `lm_eval:TASK` ('' when it names none), else None."""
    return source[len(SOURCE_PREFIX) :].strip() if source.startswith(SOURCE_PREFIX) else None


def _require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError as error:
        raise UserError(
            "an lm_eval: domain needs lm-eval-harness; install the extra: pip install 'safemerge[lm-eval]'"
        ) from error


def _engine_lm_class():
    """EngineLM is defined on first use: lm-eval is an optional extra, imported only where a task is scored."""
    _require_lm_eval()
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    class EngineLM(TemplateLM):
        """An lm-eval LM answered by a safemerge backend (vLLM or transformers) and the weights it holds now.

        Log-likelihoods come from the backend's teacher-forced scoring (`reference_nlls`); `is_greedy` is not
        computed (always False), so metrics that read it (lambada's acc) are not supported. Generation is greedy
        and cut at the request's stop strings."""

        def __init__(self, backend, scorer=None) -> None:
            super().__init__()
            self.backend = backend
            self.scorer = scorer or backend  # holds the same weights; on the CPU a transformers model scores faster
            self.tokenizer = backend.chat_tokenizer.tokenizer

        @property
        def eot_token_id(self) -> int:
            return self.backend.chat_tokenizer.eos_id

        @property
        def prefix_token_id(self) -> int:
            bos = self.tokenizer.bos_token_id
            return bos if bos is not None else self.eot_token_id

        @property
        def max_length(self) -> int:
            return self.backend.max_model_len

        @property
        def tokenizer_name(self) -> str:
            return str(self.backend.model_dir)

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            return self.tokenizer.chat_template if chat_template else None

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            return self.tokenizer.apply_chat_template(
                chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
            )

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            # A context rendered by the chat template already carries its special tokens.
            return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            spans = []
            for index, (_, context, continuation) in enumerate(requests):
                # The engine needs room for one generated token; the oldest context tokens go first, as lm-eval's
                # own models truncate.
                ids = (context + continuation)[-(self.max_length - 1) :]
                spans.append((index, max(1, len(ids) - len(continuation)), ids))
            return [(-nll, False) for nll in self.scorer.reference_nlls(spans)]

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            results = []
            for request in requests:
                (text,) = request.args
                windows = [
                    make_disjoint_window(window)
                    for window in get_rolling_token_windows(
                        token_list=self.tok_encode(text),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length - 1,
                        context_len=1,
                    )
                ]
                spans = [(i, len(context), context + target) for i, (context, target) in enumerate(windows)]
                results.append(-sum(self.scorer.reference_nlls(spans)))
            return results

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            answers = []
            for request in requests:
                context, options = request.args
                options = dict(options or {})
                until = options.get("until") or []
                until = [until] if isinstance(until, str) else list(until)
                max_tokens = int(options.get("max_gen_toks", 256))
                ids = self.tok_encode(context)[-(self.max_length - 1) :]
                max_tokens = max(1, min(max_tokens, self.max_length - len(ids)))
                ((text, _),) = self.backend.generate_answers([(0, ids)], max_tokens, 0.0, None)
                for stop in until:
                    if stop and stop in text:
                        text = text[: text.index(stop)]
                answers.append(text)
            return answers

    return EngineLM


def engine_lm(backend, scorer=None):
    """An lm-eval `LM` over `backend` (a safemerge generation backend holding the weights to score); log-likelihoods
    on `scorer` when given (a backend holding the same weights)."""
    return _engine_lm_class()(backend, scorer)


@dataclass
class LmEvalDomain:
    """One lm-eval task as a domain set: its evaluation documents (what lm-eval itself would score) are shuffled
    with the search's seed and halved, the first half for `dev`, the second for `test`, so the search never sees
    the documents its reported figures come from."""

    task_name: str
    include_path: Path | None = None
    seed: int = 0
    chat: bool = True  # questions rendered with the model's chat template, as the zoo and instruct models expect
    metric: str = field(init=False)
    document_count: int = field(init=False)

    def __post_init__(self) -> None:
        _require_lm_eval()
        from lm_eval.tasks import TaskManager, get_task_dict

        if self.include_path is not None and not Path(self.include_path).is_dir():
            raise UserError(
                f"lm-eval task folder {self.include_path} does not exist; set evaluation.lm_eval_include_path to "
                "the folder of your task YAML files"
            )
        # Your own folder alone first: indexing lm-eval's hundreds of built-in tasks takes seconds.
        manager = (
            TaskManager(include_path=str(self.include_path), include_defaults=False) if self.include_path else None
        )
        if manager is None or self.task_name not in manager.all_tasks:
            manager = TaskManager(include_path=str(self.include_path) if self.include_path else None)
        if self.task_name not in manager.all_tasks:
            raise UserError(
                f"lm-eval has no task {self.task_name!r}"
                + (f" (nor does {self.include_path})" if self.include_path else "")
                + "; list them with `lm-eval ls tasks`, or set evaluation.lm_eval_include_path to your task folder"
            )
        try:
            self.task_dict = get_task_dict([self.task_name], manager)
        except Exception as error:  # a hub download that cannot happen here, a malformed YAML, ...
            raise UserError(f"lm-eval task {self.task_name!r} could not be loaded: {error}") from error
        task = self.task_dict[self.task_name]
        metrics = [entry["metric"] for entry in task.config.metric_list or []]
        usable = [name for name in RATE_METRICS if name in metrics]
        if not usable:
            raise UserError(
                f"lm-eval task {self.task_name!r} reports {metrics}; a domain objective needs a 0/1 per-document "
                f"metric, one of {list(RATE_METRICS)}"
            )
        self.metric = usable[0]
        self.metrics = usable
        self.document_count = len(task.eval_docs)
        if self.document_count < 2:
            raise UserError(f"lm-eval task {self.task_name!r} has {self.document_count} documents; dev and test need 2")

    def documents(self, split: str) -> list[int]:
        """The task's document indices that belong to `split` ('dev' or 'test')."""
        if split not in ("dev", "test"):
            raise UserError(f"an lm-eval domain has dev and test documents only, not {split!r}")
        order = list(range(self.document_count))
        random.Random(self.seed).shuffle(order)
        half = self.document_count // 2
        return sorted(order[:half] if split == "dev" else order[half:])

    def judge(self, backend, documents: Sequence[int], scorer=None) -> dict[str, list[bool]]:
        """Each usable metric's per-document verdicts, in the order of `documents`, for the weights `backend`
        holds now (its log-likelihoods on `scorer` when given, holding the same weights)."""
        if not documents:
            return {name: [] for name in self.metrics}
        from lm_eval.evaluator import evaluate

        results = evaluate(
            lm=engine_lm(backend, scorer),
            task_dict=self.task_dict,
            samples={self.task_name: list(documents)},
            log_samples=True,
            bootstrap_iters=0,
            apply_chat_template=self.chat,
        )
        by_document = {sample["doc_id"]: sample for sample in results["samples"][self.task_name]}
        verdicts: dict[str, list[bool]] = {name: [] for name in self.metrics}
        for document in documents:
            sample = by_document[document]
            for name in self.metrics:
                value = float(sample[name])
                if value not in (0.0, 1.0):
                    raise UserError(
                        f"lm-eval task {self.task_name!r} scored document {document} {name}={value}; a domain "
                        "objective needs 0 or 1 per document"
                    )
                verdicts[name].append(value == 1.0)
        return verdicts
