"""esper.oona"""
