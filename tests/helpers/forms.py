from core import config as C
from ui import train_form


def form_values(cfg: C.RunConfig):
    names = ["model.source", "data.source", "data.format", "data.columns"] + [
        n for g in train_form.GROUPS.values() for n, _ in g]
    return names, train_form.values_of(names, cfg)
