"""Serving the model: the worker threads (queue -> micro-batches -> model), recovery after a
failed call, and the watchdog for calls past their deadline. What runs the model is runtime/."""
