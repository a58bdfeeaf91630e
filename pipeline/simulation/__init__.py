"""Simulated active learning on a pool whose labels are known: one cycle loop for every engine
(`run_cycles`), the in-memory engine (no Ray: a protocol's cost is training and scoring, not job
start-up), and the results a simulation writes."""

from pipeline.simulation.arrays import ArrayPool, load_array_pool
from pipeline.simulation.chain import SimulationProtocol, initial_keys, subset_rows
from pipeline.simulation.config import ENGINES, MODEL_FREE, MODES, SimulateConfig
from pipeline.simulation.fit import NetworkWeights, TrainedModel, evaluate, train_in_memory
from pipeline.simulation.loop import ChainSteps, CycleModel, CycleRow, FirstCycles, Picked, run_cycles
from pipeline.simulation.memory import InMemorySteps, check_candidate_budget, in_memory
from pipeline.simulation.query import classifier_head, query_in_memory, score_rows
from pipeline.simulation.results import write_results

__all__ = [
    "ENGINES",
    "MODEL_FREE",
    "MODES",
    "ArrayPool",
    "ChainSteps",
    "CycleModel",
    "CycleRow",
    "FirstCycles",
    "InMemorySteps",
    "NetworkWeights",
    "Picked",
    "SimulateConfig",
    "SimulationProtocol",
    "TrainedModel",
    "check_candidate_budget",
    "classifier_head",
    "evaluate",
    "in_memory",
    "initial_keys",
    "load_array_pool",
    "query_in_memory",
    "run_cycles",
    "score_rows",
    "subset_rows",
    "train_in_memory",
    "write_results",
]
