"""The names of the metrics the engine logs each epoch: its loss terms and the method's health.

Plain names, no torch: the results schema has a column per metric without loading the engine.
"""

GENERATOR_TERMS = ("kd", "ikd", "bn", "scl", "ce")
STUDENT_TERMS = ("kd", "ikd", "ce")
LOSS_METRICS = (
    tuple(f"g_{t}" for t in GENERATOR_TERMS) + ("g_total",) + tuple(f"s_{t}" for t in STUDENT_TERMS) + ("s_total",)
)
# Health of the method, measured on the student steps' synthetic batches: does the teacher assign the
# images to their pseudo-labels (the pseudo-supervision at work), and how large are the logits.
SYNTHESIS_METRICS = ("teacher_pseudo_acc", "teacher_logit_rms", "student_logit_rms")
# With eval.term_gradients: each generator term's weighted gradient norm at the generator's weights.
TERM_GRADIENT_METRICS = tuple(f"g_grad_{t}" for t in GENERATOR_TERMS)
# With loss.agreement_target: the generator's pseudo-label CE weight, eta times its steered multiplier.
CONTROL_METRICS = ("g_ce_weight",)
