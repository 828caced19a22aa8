"""The web page: runs dashboard and chat (`llamaforge ui`), every asset served locally."""
