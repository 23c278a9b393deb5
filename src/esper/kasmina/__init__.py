"""esper.kasmina"""
