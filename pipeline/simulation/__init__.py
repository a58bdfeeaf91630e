"""Simulated active learning in one process, on a pool decoded into memory (no Ray): what
`lplgrad simulate` runs by default, so a protocol's cost is training and scoring, not job start-up."""

from pipeline.simulation.arrays import ArrayPool, load_array_pool
from pipeline.simulation.chain import FirstCycles, Protocol, initial_keys, run_chain_in_memory, subset_rows
from pipeline.simulation.fit import NetworkWeights, TrainedModel, evaluate, train_in_memory
from pipeline.simulation.query import classifier_head, query_in_memory, score_rows

__all__ = [
    "ArrayPool",
    "FirstCycles",
    "NetworkWeights",
    "Protocol",
    "TrainedModel",
    "classifier_head",
    "evaluate",
    "initial_keys",
    "load_array_pool",
    "query_in_memory",
    "run_chain_in_memory",
    "score_rows",
    "subset_rows",
    "train_in_memory",
]
