"""What a site's train reply holds: its metric keys, without and with sample-level DP.

A site sends exactly one of these sets (client/client_app.py) and the server accepts no
other (server/replies.py). Under sample-level DP the train loss and accuracy are left out:
they are computed on the private batches without noise, outside what the accountant
covers (docs/privacy.md); the accountant's own figures go in their place.
"""

from __future__ import annotations

TRAIN_KEYS = frozenset(
    {
        "num-examples",
        "num_examples",
        "train_loss",
        "train_accuracy",
        "steps",
        "seconds",
        "images_per_second",
    }
)
TRAIN_KEYS_DP = frozenset(
    (TRAIN_KEYS - {"train_loss", "train_accuracy"})
    | {"epsilon", "delta", "noise_multiplier", "dp-budget-exhausted"}
)

# The query action that asks a site for its feature statistics (common/headfit.py): the
# message type is "query.feature_stats".
FEATURE_STATS = "feature_stats"
