"""The union mount. Only this package imports pyfuse3 and trio."""
