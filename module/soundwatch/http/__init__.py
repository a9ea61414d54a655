"""The HTTP API: the reference service's inference service, inside the module.

- :mod:`soundwatch.http.app`: the Flask app (routes, auth, errors, limits);
- :mod:`soundwatch.http.server`: waitress in a background thread;
- :mod:`soundwatch.http.metrics`: ``/metrics`` from the pipeline's counters;
- :mod:`soundwatch.http.cli`: ``run --http`` and ``soundwatch serve``.

``openapi.yaml`` beside this file describes every route. Importing this
package imports nothing heavy; Flask and waitress load with the submodules.
"""
