"""esper.tolaria.control"""
