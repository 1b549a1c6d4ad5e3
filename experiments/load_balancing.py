"""Load-balancing study: no balancing, the Switch aux loss, DeepSeek-V3's aux-loss-free bias
(alone and with the sequence-wise loss), and sigmoid against softmax scores, at equal compute.

  python -m moe_jax.sweep experiments/load_balancing.py:tiny --seeds=0,1,2
  python -m moe_jax.sweep experiments/load_balancing.py:gpu --seeds=0,1 \
      --members=none,switch_1e-3,aux_free_1e-3,aux_free_1e-2

On one GPU the study runs its four main arms (GPU_ARMS below): no balancing, the Switch loss,
and aux-loss-free balancing at two rates.
"""

from experiments.sizes import size
from moe_jax.sweep import Sweep

OFF = {"balancing.bias_update_rate": 0.0, "balancing.switch_loss_alpha": 0.0,
       "balancing.sequence_loss_alpha": 0.0}
AUX_FREE = {**OFF, "balancing.bias_update_rate": 1e-3}

MEMBERS = {
    "none": OFF,
    "switch_1e-2": {**OFF, "balancing.switch_loss_alpha": 1e-2},
    "switch_1e-3": {**OFF, "balancing.switch_loss_alpha": 1e-3},
    "switch_1e-4": {**OFF, "balancing.switch_loss_alpha": 1e-4},
    "aux_free_1e-4": {**OFF, "balancing.bias_update_rate": 1e-4},
    "aux_free_1e-3": AUX_FREE,                     # sigmoid scores, as every member but the last
    "aux_free_1e-2": {**OFF, "balancing.bias_update_rate": 1e-2},
    "aux_free_1e-3+seq_1e-4": {**AUX_FREE, "balancing.sequence_loss_alpha": 1e-4},
    "aux_free_1e-3_softmax": {**AUX_FREE, "router.score_function": "softmax"},
}

GPU_ARMS = "none,switch_1e-3,aux_free_1e-3,aux_free_1e-2"

QUESTION = ("Does aux-loss-free balancing keep MaxVio over the validation set at or below 0.1 "
            "while matching or beating the best aux-loss validation loss? (Wang et al. 2024, "
            "arXiv:2408.15664, the aux-loss-free method's paper, at 1B parameters: MaxVio_global "
            "0.04 against 0.72 for the aux loss, perplexity 9.50 against 9.56.) Router scores are "
            "sigmoid unless the member says softmax; dispatch is dropless, so no member buys "
            "balance or loss with dropped tokens.")


def get_sweep(size_name: str) -> Sweep:
  config, base = size(size_name)
  return Sweep("load_balancing", config, base, MEMBERS, QUESTION)
