"""The two-stage served model's code: `recsys serve build --ranker-run-id` logs this file with MLflow
models-from-code (recsys.retrieval.serve_two_stage). It runs in the model's environment, where the
recsys package travels as code_paths."""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd

from recsys.retrieval.serve import parse_histories, parse_requests
from recsys.retrieval.serve_two_stage import answer_two_stage, load_two_stage


class TwoStageModel(mlflow.pyfunc.PythonModel):
    """Top-N of the Two-Tower per request row re-ranked by the ranker to the top k."""

    def load_context(self, context: Any) -> None:
        """Load the retrieval state, the ranker and N from the model's artifacts."""
        self._state = load_two_stage(context.artifacts)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        """Rows {user_id, k[, history]} → rows {user_id, items, scores, fallback, retrieval_ranks
        [, unknown_items]}; bad rows → 400 (`parse_requests`)."""
        users, ks = parse_requests(model_input)
        return answer_two_stage(self._state, users, ks, parse_histories(model_input))


mlflow.models.set_model(TwoStageModel())
