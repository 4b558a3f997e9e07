"""Training recipes for the pieces aps ships (the frozen priors): configs and reusable steps, no loops."""
