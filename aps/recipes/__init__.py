"""Training recipes for what aps ships. The *.toml files are train.py's recipes (aps.recipe reads them: one per
shipped flow, the gated mixture recipe, and defaults.toml, which names the default per task kind); prior.py and
prior_eval.py hold the frozen priors' recipes: configs and reusable steps, no loops."""
