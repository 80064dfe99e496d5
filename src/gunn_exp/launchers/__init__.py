"""How a sweep's jobs are started where Hydra's launchers need more than their config:
`hydra/launcher=ray` (ray_sweep: the driver; ray_task: inside each job; ray_checks: the refusals
before any job starts). Hydra instantiates launcher classes only from the `hydra_plugins`
namespace, so the class itself is `hydra_plugins.gunn_exp_launchers.ray_launcher.RayLauncher`.

Above `cli` (its preamble and exit-status rule end a sweep the way they end a run); imports no
training code: a job runs the entry script's own task function.
"""
