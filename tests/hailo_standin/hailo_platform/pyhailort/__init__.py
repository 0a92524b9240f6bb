"""The stand-in's `hailo_platform.pyhailort` package (classes live in `pyhailort.pyhailort`)."""
