"""Serving-side retrieval from a trained Two-Tower MLflow run.

- `index`: item embeddings → a FAISS inner-product index (exact flat, IVF or HNSW) saved with the raw
  item ids; approximate indexes report their recall@K against exact search; `recsys index build`.
- `recommend`: top-K items for every (or the listed) user, seen items removed, popularity for users
  the vocabulary does not know; `recsys recommend`.
- `runs`: the run's config, embeddings and artifacts fetched through MLflow's client.
- `bench`: `make bench-recommend`.

faiss, mlflow and pyarrow are imported inside functions: `import recsys.retrieval` stays light.
"""
