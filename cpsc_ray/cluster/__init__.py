"""The Ray layers: Ray Train runs, Ray Tune experiments and their search spaces, finalize and job
submission. The only package that imports Ray; it drives ``runs`` and never reimplements them."""
