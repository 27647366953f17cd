"""sparktune's model: one artifact (``artifact``, ``pyfunc``), one inference core (``hf``), one
resolver of model URIs (``resolve``).

* ``hf``: loading, padding, forward passes, pip requirements; shipped inside every model.
* ``pyfunc``: the MLflow pyfunc that is logged, registered, served and exported.
* ``artifact``: writes that pyfunc (``save_model``, ``log_model``).
* ``resolve``: finds the model behind a folder or MLflow URI (``resolve_model``) and fetches it
  on executors (``fetch_model``).
"""

__all__ = ["artifact", "hf", "pyfunc", "resolve"]
