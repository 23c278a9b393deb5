"""esper.tolaria"""
