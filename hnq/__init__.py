"""Torch-free core shared by the producer and the workers: message and record schemas, error
codes, URI handling and storage backends. Nothing under ``hnq`` may import torch: the producer
side (``hardnet submit/status/results``) is installable without it."""
