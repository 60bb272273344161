"""The engine under every trainer: devices and torchrun, the budget and fitted schedules, the
training loop over a method's hooks, checkpoints."""

from inrseg.core.seeding import step_rng, torch_generator
from inrseg.engine.budget import (OPEN_ENDED_STEPS, SCHEDULE_MARGIN, SCHEDULE_STEPS_KEY, Budget, as_budget,
                                  seconds_per_call, steps_that_fit, timed_schedule_steps)
from inrseg.engine.devices import DEVICE_CHOICES, autocast, resolve_device, use_bf16
from inrseg.engine.distributed import (all_reduce_mean_, all_reduce_sum_, barrier, broadcast_object, distributed_env,
                                       init_distributed, is_distributed_env, is_main, leave_distributed, local_rank,
                                       shard, world, wrap_ddp)
from inrseg.engine.loop import LoopResult, LoopSettings, MetricsLog, StepOutput, TrainTask, run_training

__all__ = ["OPEN_ENDED_STEPS", "SCHEDULE_MARGIN", "SCHEDULE_STEPS_KEY", "DEVICE_CHOICES", "Budget", "LoopResult",
           "LoopSettings", "MetricsLog", "StepOutput", "TrainTask", "all_reduce_mean_", "all_reduce_sum_",
           "as_budget", "autocast", "barrier", "broadcast_object", "distributed_env", "init_distributed",
           "is_distributed_env", "is_main", "leave_distributed", "local_rank", "resolve_device", "run_training", "seconds_per_call",
           "shard", "step_rng", "steps_that_fit", "timed_schedule_steps", "torch_generator", "use_bf16", "world",
           "wrap_ddp"]
