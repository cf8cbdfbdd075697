"""The viewer: ``raymask serve`` (``server``) and what it draws (``render``)."""
