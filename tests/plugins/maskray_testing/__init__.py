"""Objectives used only by the tests (a plugin package: ``MASKRAY_PLUGINS=objectives,maskray_testing``)."""
