"""Server-side aggregation: pure maths (``maths``), record names (``records``), and thin Flower
strategies (``flower``, imports flwr).
"""
