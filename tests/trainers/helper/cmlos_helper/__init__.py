VALUE = "from the uploaded wheel"
