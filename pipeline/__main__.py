from geosteer.pipeline.cli import main

main()
