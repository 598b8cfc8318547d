"""hant.tools: the ``hant`` command line, model loading, reports and the bundled example network."""
