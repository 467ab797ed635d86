"""recsys: train TorchRec recommenders (Two-Tower, DLRM) from MDS data, anywhere.

Kept light on purpose: nothing heavy (torch.distributed, kfp, kubernetes, pyspark, mlflow) is imported here.
"""

__version__ = "0.1.0"
