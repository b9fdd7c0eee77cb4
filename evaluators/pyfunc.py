"""The MLflow pyfunc flavour of a merged model: `mlflow.pyfunc.load_model(uri).predict(["prompt", ...])`
answers each prompt greedily with the folder's chat template (transformers backend)."""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc


class MergedChatModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from safemerge.evaluators.generation import HFGenerator

        self.generator = HFGenerator(Path(context.artifacts["model_dir"]))

    def predict(self, context, model_input, params: dict | None = None) -> list[str]:
        from safemerge.evaluators.generation import user_turns

        prompts = list(model_input["prompt"]) if hasattr(model_input, "columns") else list(model_input)
        max_tokens = int((params or {}).get("max_tokens", 64))
        texts = self.generator.chat(user_turns(prompts), max_tokens=max_tokens).texts
        return ["" if text is None else text for text in texts]
