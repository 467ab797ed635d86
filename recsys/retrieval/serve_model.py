"""The served model's code: `recsys serve build` logs this file with MLflow models-from-code.

MLflow runs this file when it loads the model and serves the object `set_model` names, so nothing is
pickled. It runs in the model's environment (its recorded pip requirements, no torch, no recsys
install: `recsys.retrieval.serve.SERVING_CODE` travels with the model), so it imports only those.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd

from recsys.retrieval.serve import answer, load_state, parse_histories, parse_requests


class RetrievalModel(mlflow.pyfunc.PythonModel):
    """Top-k unseen items of a Two-Tower run per request row; popularity for unknown users."""

    def load_context(self, context: Any) -> None:
        """Load index, embeddings, seen items and popularity from the model's artifacts."""
        self._state = load_state(context.artifacts)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Rows {user_id, k[, history]} → rows {user_id, items, scores, fallback[, unknown_items]};
        bad rows → 400 (`parse_requests`)."""
        users, ks = parse_requests(model_input)
        return answer(self._state, users, ks, parse_histories(model_input))


mlflow.models.set_model(RetrievalModel())
