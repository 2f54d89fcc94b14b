from services.cache.server import main

# Guarded: engines that start worker processes with "spawn" (vLLM) re-import this module in the child.
if __name__ == "__main__":
    main()
