"""The HTML report of a ``circtune search`` folder and the comparison of folders from different devices."""
