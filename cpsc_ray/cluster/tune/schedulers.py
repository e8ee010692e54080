"""PBT and PB2 that stay aligned with the trials' checkpoints across ``tune --resume``.

Ray does not save a PBT or PB2 scheduler's state with the experiment. Restored, it would count the next
perturbation interval from epoch 0 and perturb on epochs where no trial checkpoints: an exploited trial
would then rerun epochs from the source's earlier checkpoint. Here a restored trial starts at the last
perturbation boundary it reached, where its checkpoint is.

Ray's exploit also hands the trial the better trial's checkpoint without invalidating the trial's cached
snapshot: an experiment saved before the exploited trial reports again records its own checkpoint, and
resumed, the trial would go on from its own state under the clone's hyperparameters, the exploit lost.
"""

from __future__ import annotations

from ray.tune.schedulers import PopulationBasedTraining
from ray.tune.schedulers.pb2 import PB2


class ResumesAligned:
    def on_trial_add(self, tune_controller, trial) -> None:
        super().on_trial_add(tune_controller, trial)
        reached = (trial.last_result or {}).get(self._time_attr)
        if reached:  # a trial restored with the experiment
            boundary = reached - reached % self._perturbation_interval
            state = self._trial_state[trial]
            state.last_perturbation_time = state.last_train_time = boundary
            self._next_perturbation_sync = max(self._next_perturbation_sync, boundary + self._perturbation_interval)

    def _exploit(self, tune_controller, trial, trial_to_clone) -> None:
        super()._exploit(tune_controller, trial, trial_to_clone)
        trial.run_metadata.invalidate_cache()  # the next experiment snapshot names the cloned checkpoint


class AlignedPBT(ResumesAligned, PopulationBasedTraining):
    pass


class AlignedPB2(ResumesAligned, PB2):
    pass
