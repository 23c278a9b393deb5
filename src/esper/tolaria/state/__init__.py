"""esper.tolaria.state"""
