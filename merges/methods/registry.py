"""The method table METHODS: every merge method by name, with its parameters, kernel, model roles and the facts
other layers ask about it (mergekit's name, whether it is random, sparsifying, or open to a search)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from safemerge.errors import UserError
from safemerge.merges.methods.elementwise import arcee_fusion, nearswap, ram, ramplus_tl, sce
from safemerge.merges.methods.inputs import INTERPOLATION, WEIGHTS, Param, SearchRange, TensorInputs
from safemerge.merges.methods.interpolation import karcher, linear, model_stock, multislerp, nuslerp, slerp
from safemerge.merges.methods.sparsify import Sparsification
from safemerge.merges.methods.task_arithmetic import Consensus, TaskArithmetic

if TYPE_CHECKING:
    from safemerge.merges.recipe import Recipe


@dataclass(frozen=True)
class MergeMethod:
    """A named method: its parameters, which inputs it takes, its kernel, and what a search may do with it."""

    name: str
    params: tuple[Param, ...]
    kernel: Callable[[TensorInputs, dict, dict[str, dict], torch.Tensor], torch.Tensor]
    base: str = "required"  # required | optional | input (linear: the base is one more weighted input)
    min_models: int = 1  # models other than the base
    max_models: int | None = None
    mergekit_name: str = ""
    random: bool = False
    role_weights: dict[str, str] | None = field(default=None)
    # A search may choose it: search/space.py builds its recipes from this row (its Params' search ranges; a
    # method of one model besides the base goes from the aligned model to the expert).
    searchable: bool = False
    # Works on task vectors element by element (masks, sign votes), so they must be taken against the engine's
    # base, the one its store subtracts; the others combine whole models and take any held model as base_model.
    engine_base: bool = False
    # Needs alignment_model (the model whose task vector is the alignment vector) without role weights.
    needs_alignment: bool = False
    # A method defined as a recipe of another method (safety_vector: a dare_linear), merged and exported as that;
    # called with the recipe and, where the models are at hand, layer_cosines(model_a, model_b): the cosine of
    # their task vectors per layer (None without the models).
    lower: Callable[[Recipe, LayerCosines | None], Recipe] | None = None

    def inputs(self, recipe: Recipe) -> list[str]:
        """The models the kernel mixes, in recipe order (the base only where it is a weighted input)."""
        models = [entry.model for entry in recipe.models if entry.model != recipe.base_model or self.base == "input"]
        if self.base == "input" and recipe.base_model is not None and recipe.base_model not in models:
            models.append(recipe.base_model)  # mergekit adds an unlisted base to a linear merge
        return models

    def check_roles(self, recipe: Recipe, source: str) -> None:
        if self.base == "required" and recipe.base_model is None:
            raise UserError(f"{source}: {self.name} needs base_model; add base_model: PATH")
        others = [entry.model for entry in recipe.models if entry.model != recipe.base_model]
        if self.base == "input":
            others = self.inputs(recipe)
        if len(others) < self.min_models or (self.max_models is not None and len(others) > self.max_models):
            wanted = (
                f"exactly {self.min_models}" if self.min_models == self.max_models else f"at least {self.min_models}"
            )
            raise UserError(
                f"{source}: {self.name} merges {wanted} model(s) besides the base, got {len(others)}; list "
                f"{wanted} under models (besides base_model)"
            )
        if self.role_weights or self.needs_alignment:
            if recipe.alignment_model not in others:
                raise UserError(
                    f"{source}: {self.name} needs alignment_model set to one of the models ({', '.join(others)}); "
                    "its task vector is the alignment vector"
                )
        elif recipe.alignment_model is not None:
            raise UserError(
                f"{source}: alignment_model applies to mergealign and safety_vector only; remove it for {self.name}"
            )

    def role(self, recipe: Recipe, model: str) -> str:
        return "alignment" if model == recipe.alignment_model else "domain"


def _task_arithmetic(
    name: str, row: TaskArithmetic, mergekit_name: str | None = None, searchable: bool = False
) -> MergeMethod:
    """A row of the task-arithmetic family as a method."""
    return MergeMethod(
        name=name,
        params=row.params(),
        kernel=row,
        min_models=2 if row.role_weights else 1,
        mergekit_name=mergekit_name or name,
        random=row.sparsification in (Sparsification.random, Sparsification.della),
        role_weights=row.role_weights,
        searchable=searchable,
        engine_base=row.sparsification != Sparsification.none or row.consensus != Consensus.none,
    )


# One entry per method, in the order a search lists the methods it may choose.
S, C = Sparsification, Consensus
METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod(
            "linear",
            (Param("weight", float, None, per_model=True, search=WEIGHTS), Param("normalize", bool, True)),
            linear,
            base="input",
            mergekit_name="linear",
            searchable=True,
        ),
        _task_arithmetic("task_arithmetic", TaskArithmetic(), searchable=True),
        _task_arithmetic("ties", TaskArithmetic(S.magnitude, C.sum, normalize=True), searchable=True),
        _task_arithmetic("dare_ties", TaskArithmetic(S.random, C.sum, rescale=True), searchable=True),
        _task_arithmetic("dare_linear", TaskArithmetic(S.random, rescale=True), searchable=True),
        _task_arithmetic("breadcrumbs", TaskArithmetic(S.breadcrumbs), searchable=True),
        _task_arithmetic("breadcrumbs_ties", TaskArithmetic(S.breadcrumbs, C.sum), searchable=True),
        _task_arithmetic("della", TaskArithmetic(S.della, C.sum, normalize=True, rescale=True), searchable=True),
        _task_arithmetic("della_linear", TaskArithmetic(S.della, rescale=True), searchable=True),
        MergeMethod(
            "slerp",
            (Param("t", float, None, search=INTERPOLATION),),
            slerp,
            min_models=1,
            max_models=1,
            mergekit_name="slerp",
            searchable=True,
        ),
        # MergeAlign: base + lambda_domain * domain vectors + lambda_align * alignment vector.
        _task_arithmetic(
            "mergealign",
            TaskArithmetic(role_weights={"alignment": "lambda_align", "domain": "lambda_domain"}),
            mergekit_name="task_arithmetic",
            searchable=True,
        ),
        MergeMethod(
            "nuslerp",
            (
                Param("weight", float, None, per_model=True),
                Param("nuslerp_row_wise", bool, False),
                Param("nuslerp_flatten", bool, True),
            ),
            nuslerp,
            base="optional",
            min_models=2,
            max_models=2,
            mergekit_name="nuslerp",
        ),
        MergeMethod(
            "model_stock",
            (Param("filter_wise", bool, False),),
            model_stock,
            min_models=2,
            mergekit_name="model_stock",
        ),
        MergeMethod(
            "multislerp",
            (
                Param("weight", float, None, per_model=True, search=WEIGHTS),
                Param("normalize_weights", bool, True),
                Param("eps", float, 1e-8),
            ),
            multislerp,
            base="optional",
            mergekit_name="multislerp",
            searchable=True,
        ),
        MergeMethod(
            "karcher",
            (Param("max_iter", int, 10), Param("tol", float, 1e-5)),
            karcher,
            base="input",
            mergekit_name="karcher",
            searchable=True,
        ),
        # nearswap's t is a distance between weights, not a share: mergekit's example uses 0.0001.
        MergeMethod(
            "nearswap",
            (Param("t", float, None, search=SearchRange(0.0, 0.01, standard=0.0001)),),
            nearswap,
            max_models=1,
            mergekit_name="nearswap",
            searchable=True,
        ),
        MergeMethod("arcee_fusion", (), arcee_fusion, max_models=1, mergekit_name="arcee_fusion", searchable=True),
        MergeMethod(
            "sce",
            (
                Param("int8_mask", bool, False),
                Param("select_topk", float, 1.0, search=SearchRange(0.1, 1.0, standard=1.0, layered=False)),
            ),
            sce,
            mergekit_name="sce",
            engine_base=True,
            searchable=True,
        ),
        MergeMethod(
            "ram", (Param("epsilon", float, 1e-5),), ram, mergekit_name="ram", engine_base=True, searchable=True
        ),
        MergeMethod(
            "ramplus_tl",
            (
                Param("r", float, 0.1, search=SearchRange(0.0, 1.0, standard=0.1, layered=False)),
                Param("alpha", float, 0.2, search=SearchRange(0.0, 1.0, standard=0.2, layered=False)),
                Param("epsilon", float, 1e-5),
            ),
            ramplus_tl,
            mergekit_name="ramplus_tl",
            engine_base=True,
            searchable=True,
        ),
    )
}


LayerCosines = Callable[[str, str], list[float]]


def _safety_vector_as_dare_linear(recipe: Recipe, layer_cosines: LayerCosines | None = None) -> Recipe:
    """RESTA's safety vector as a dare_linear: each expert at weight 1 and density 1 (its task vector as it is),
    the alignment model at weight lambda_safety and `density` (DARE on aligned - base, rescaled)."""
    from safemerge.merges.recipe import ModelEntry

    safety = {"weight": recipe.parameters.get("lambda_safety", 1.0), "density": recipe.parameters.get("density", 0.5)}
    models = [
        ModelEntry(model=entry.model, parameters=safety if entry.model == recipe.alignment_model else EXPERT_AS_IS)
        for entry in recipe.models
        if entry.model != recipe.base_model
    ]
    return recipe.model_copy(
        update={"merge_method": "dare_linear", "models": models, "parameters": {}, "alignment_model": None}
    )


EXPERT_AS_IS = {"weight": 1.0, "density": 1.0}
METHODS["safety_vector"] = MergeMethod(
    "safety_vector",
    (
        Param("lambda_safety", float, 1.0, search=WEIGHTS),
        Param("density", float, 0.5, search=SearchRange(0.1, 1.0, standard=0.5, layered=False)),
    ),
    METHODS["dare_linear"].kernel,
    mergekit_name="dare_linear",
    random=True,
    searchable=True,
    engine_base=True,
    needs_alignment=True,
    min_models=2,
    lower=_safety_vector_as_dare_linear,
)


def _selective_layers_as_task_arithmetic(recipe: Recipe, layer_cosines: LayerCosines | None) -> Recipe:
    """SafeMERGE from weights: a layer whose expert task vector has a cosine under `threshold` with the alignment
    vector takes expert + mix * (aligned - expert); the other layers and the tensors outside the layers keep the
    expert's. As a task_arithmetic with per-layer weights (expert 1 - mix, aligned mix in the selected layers)."""
    from safemerge.merges.recipe import ModelEntry

    if layer_cosines is None:
        raise UserError(
            "selective_layers chooses its layers from the models' weights; merge it with `safemerge merge` (the "
            "output folder's mergekit_config.yml is its export), not `safemerge export`"
        )
    (expert,) = [e.model for e in recipe.models if e.model not in (recipe.base_model, recipe.alignment_model)]
    threshold = recipe.parameters.get("threshold", 0.0)
    mix = recipe.parameters.get("mix", 0.5)
    if not all(isinstance(value, int | float) for value in (threshold, mix)):
        raise UserError("selective_layers: threshold and mix are one number each (the rule is per layer already)")
    selected = [cosine < threshold for cosine in layer_cosines(expert, recipe.alignment_model)]

    def in_layers(values: list[float], outside: float) -> list[dict]:  # mergekit: a per-layer list, filtered
        return [{"filter": "layers.", "value": values}, {"value": outside}]

    weights = {
        expert: in_layers([1.0 - mix if chosen else 1.0 for chosen in selected], 1.0),
        recipe.alignment_model: in_layers([mix if chosen else 0.0 for chosen in selected], 0.0),
    }
    models = [ModelEntry(model=model, parameters={"weight": weight}) for model, weight in weights.items()]
    return recipe.model_copy(
        update={"merge_method": "task_arithmetic", "models": models, "parameters": {}, "alignment_model": None}
    )


METHODS["selective_layers"] = MergeMethod(
    "selective_layers",
    (
        Param("threshold", float, 0.0, search=SearchRange(-0.2, 0.4, standard=0.0, layered=False)),
        Param("mix", float, 0.5, search=SearchRange(0.0, 1.0, standard=0.5, layered=False)),
    ),
    METHODS["task_arithmetic"].kernel,
    mergekit_name="task_arithmetic",
    searchable=True,
    engine_base=True,
    needs_alignment=True,
    min_models=2,
    max_models=2,
    lower=_selective_layers_as_task_arithmetic,
)

# The rows of the generalized kernel, by method name (the engine builds their sparsification tables).
TASK_ARITHMETIC_FAMILY: dict[str, TaskArithmetic] = {
    name: method.kernel for name, method in METHODS.items() if isinstance(method.kernel, TaskArithmetic)
}


def searchable_methods() -> tuple[str, ...]:
    """The methods a search may choose, in table order."""
    return tuple(name for name, method in METHODS.items() if method.searchable)


def searched_params(method: str) -> tuple[Param, ...]:
    """The parameters of `method` a search draws (the others keep their defaults), in table order."""
    return tuple(param for param in METHODS[method].params if param.search is not None)


def sparsifies(method: str) -> bool:
    """Whether a search draws a per-model `density` for `method` (its task vectors sparsified model by model;
    False for a name that is not a method)."""
    return method in METHODS and any(p.name == "density" and p.per_model for p in searched_params(method))
