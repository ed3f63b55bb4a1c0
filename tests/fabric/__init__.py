"""A real Hyperledger Fabric network (orderer, peers, chaincode-as-a-service servers) for tests."""
