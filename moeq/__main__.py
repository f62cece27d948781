from moeq.cli.app import main

main()
