"""``custom_dataset`` loaders for the offline pydoc tasks (lm-eval imports this file by path)."""

from moebench_plugins.metrics import lmeval_tasks


def pydoc_mc(**kwargs):
    return lmeval_tasks.dataset("pydoc_mc")


def pydoc_cloze(**kwargs):
    return lmeval_tasks.dataset("pydoc_cloze")


def pydoc_gen(**kwargs):
    return lmeval_tasks.dataset("pydoc_gen")
