"""Debiasing methods, one module each, every one registered in :mod:`fairforget.methods.registry`.

* :mod:`.cda`: two-sided counterfactual data augmentation, then the shared LoRA fine-tune.
* :mod:`.task_vector`: task-vector negation (Ilharco et al. 2023), theta_0 - lambda * (theta_ft - theta_0), and
  the damage reference (the same on neutral text, aimed at nothing).
* :mod:`.self_debias`: Self-Debias (Schick et al. 2021), an inference-time wrapper every scorer accepts.
* :mod:`.bias_unlearn`: BiasUnlearn (Liu et al. 2025): NPO forget, cross-entropy retain, KL to the start.
* :mod:`.pcgu_run` (algorithm in :mod:`.pcgu`): Partitioned Contrastive Gradient Unlearning (Yu et al. 2023).
* :mod:`.head_experiment` (signal in :mod:`.head_pruning`): attention-head soft-pruning with its controls.
* :mod:`.projection`: SentenceDebias, INLP and LEACE, projections of the final hidden state folded into the LM head.
* :mod:`.selection`: the StereoSet selection-half score that chooses a method's setting (never the held-out half).

Importing the package registers every method; :func:`fairforget.methods.registry.load_output` loads any
method's output (a model folder, or a scoring wrapper such as Self-Debias) for every evaluation.
"""

# registration order is the order of the methods preset and of stage 30's table
from fairforget.methods import cda, task_vector, self_debias, bias_unlearn, pcgu_run, head_experiment, projection  # noqa: F401, I001
