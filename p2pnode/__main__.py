from p2pnode.cli.main import main

main()
