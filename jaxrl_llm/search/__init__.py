"""Search over solutions: best-of-N, step-level beam search, diverse verifier tree search, MCTS, and the
process-reward labels that guide them. See docs/search.md.

Layering: above tasks/, data/ and rewards/ (search scores candidates with a task's verifier or a reward
model), below eval/ and train/ (which run search and train on what it finds).
"""
