"""esper.tolaria.observe"""
