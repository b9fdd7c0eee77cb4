"""The objectives a search can name and which way each one improves.

Kept apart from `evaluators.objectives` (which pulls in torch and the datasets library) so that a search
config validates, and a Tune trial process starts, without loading them."""

OBJECTIVE_DIRECTIONS = {
    "safety": "max",
    "over_refusal": "min",
    "domain": "max",
    "ce_safety": "min",
    "ce_domain": "min",
    "combined": "min",
}
