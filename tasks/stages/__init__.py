"""Third floor: one module per stage, each a settings class, a `STAGE` entry and
`run(context, inputs) -> result`. A stage imports ground and models, never another stage;
tasks/registry.py lists them."""
