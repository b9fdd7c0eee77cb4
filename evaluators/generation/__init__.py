"""Generation backends behind one interface: load merged tensors in place, generate for chat prompts, and score
reference answers; `VLLMGenerator` is the engine, `HFGenerator` the transformers fallback and reference."""

from safemerge.evaluators.generation.hf_backend import HFGenerator
from safemerge.evaluators.generation.protocol import (
    ChatTokenizer,
    Conversation,
    GenerationBackend,
    Generations,
    ReferenceScores,
    TokenizedBackend,
    WeightsError,
    check_model_dir,
    checkpoint_shapes,
    open_backend,
    user_turns,
    validate_weights,
)
from safemerge.evaluators.generation.vllm_backend import VLLMGenerator, fatal_engine_error

__all__ = [
    "ChatTokenizer",
    "Conversation",
    "GenerationBackend",
    "Generations",
    "HFGenerator",
    "ReferenceScores",
    "TokenizedBackend",
    "VLLMGenerator",
    "WeightsError",
    "check_model_dir",
    "checkpoint_shapes",
    "fatal_engine_error",
    "open_backend",
    "user_turns",
    "validate_weights",
]
