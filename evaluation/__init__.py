"""
Evaluation of SARA checkpoints, one file per concern (eval.py is the command line):
  benchmarks.py  Global-MMLU / BELEBELE / MGSM files -> items; prompt templates
  scoring.py     \\boxed{} extraction, letters and numbers -> prediction, correct
  generate.py    batched generation and option log-likelihoods (responders)
  accuracy.py    run a benchmark, per-language accuracy, tables, outputs, pairing two conditions
  routing.py     routing divergence per layer and language (paper Figure 5); the band rule
  figures.py     the routing figures (matplotlib optional)
Statistics live in the top-level stats.py, shared with experiments/.
"""
