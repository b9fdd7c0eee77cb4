"""The MLflow pyfunc flavour of a merged model: `mlflow.pyfunc.load_model(uri).predict(["prompt", ...])`
answers each prompt greedily with the folder's chat template (transformers backend).

Logged as a model from code (MLflow's models-from-code): this file is the model, stored with it and run when it
loads, where `set_model` below names the model; nothing is cloudpickled, so loading runs only this reviewed file
and works across Python and library versions. `MODEL_CODE` is the path the tracker logs."""

from __future__ import annotations

from pathlib import Path

import mlflow.models
import mlflow.pyfunc

MODEL_CODE = Path(__file__)


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


mlflow.models.set_model(MergedChatModel())
