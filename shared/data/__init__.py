"""Users and their records: the population format, the embedded Shakespeare and LaMP
builders, which users a run trains, and the population's summary. Pure: no Flower."""
